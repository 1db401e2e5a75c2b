"""`clientapp` component: python_api.engine.flower.client_app.app."""
from python_api.engine.flower.client_app import build_client_app

app = build_client_app()
