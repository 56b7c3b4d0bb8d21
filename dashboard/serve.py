"""Serve the Streamlit app in this process (so an embedded chdb store is shared with ingest)."""

from __future__ import annotations

import os
from pathlib import Path

from trainwire.infra.config import Settings

APP = Path(__file__).with_name("app.py")


def serve_dashboard(settings: Settings, port: int = 8501) -> None:
    """Blocks until Ctrl-C. The app reads its store DSN from the environment of this same process."""
    from streamlit.web import bootstrap

    os.environ["TRAINWIRE_STORE"] = settings.store_dsn
    flags = {
        "server.port": port, "server.headless": True, "server.fileWatcherType": "none",
        "browser.gatherUsageStats": False, "server.runOnSave": False, "global.developmentMode": False,
        "client.toolbarMode": "viewer",
    }
    bootstrap.load_config_options(flag_options=flags)
    bootstrap.run(str(APP), False, [], flags)
