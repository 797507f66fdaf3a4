"""Streamlit app for previewd's browser tests: a text input whose value comes back from the
server reversed, so a round trip through Streamlit's WebSocket is visible on the page."""

import streamlit as st

st.title("previewd streamlit test")
text = st.text_input("Text to reverse", key="text")
if text:
    st.markdown(f"reversed: **{text[::-1]}**")
