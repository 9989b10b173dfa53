from tsotsa.coordinator.cli import app

app(prog_name="tsotsa-coordinator")
