"""Web UIs: the Streamlit chat page and the Gradio VLM demo."""
