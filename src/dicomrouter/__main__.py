from dicomrouter.cli.main import app

app(prog_name="dicomrouter")
