from tsotsa.peer.cli import app

app(prog_name="tsotsa-peer")
