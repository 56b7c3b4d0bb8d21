"""The Streamlit dashboard: reads the store through the read API only, never writes."""
