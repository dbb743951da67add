"""The web interface (`flightlog ui`): a Streamlit app reading the local store."""

__all__: list[str] = []
