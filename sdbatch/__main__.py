from sdbatch.cli import app

app(prog_name="sdbatch")
