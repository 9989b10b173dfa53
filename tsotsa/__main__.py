from tsotsa.cli import app

app(prog_name="tsotsa")
