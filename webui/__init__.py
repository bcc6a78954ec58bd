"""Web UI: the Streamlit chat page (webui/app.py), which talks to the server over HTTP only."""
