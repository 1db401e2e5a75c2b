"""`serverapp` component: python_api.engine.flower.server_app.app (reads the run config)."""
from python_api.engine.flower.server_app import build_server_app

app = build_server_app()
