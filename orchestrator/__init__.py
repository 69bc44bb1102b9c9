"""orchestrate: blue-green and canary releases of PostgreSQL-backed services."""

import warnings

# A dependency (dateparser, through prometheus-api-client) asks platformdirs for a
# runtime directory at import; in containers and CI XDG_RUNTIME_DIR is unset and the
# fallback is fine, so its warning is only noise on a user's terminal.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

__version__ = "0.1.0"
