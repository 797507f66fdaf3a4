"""Gradio app for previewd's browser tests: a button whose result is computed on the server
and delivered over Gradio's queue (server-sent events)."""

import gradio as gr


def multiply(a, b):
    return f"product: {int(a) * int(b)}"


with gr.Blocks(title="previewd gradio test") as demo:
    a = gr.Number(value=21, label="a", elem_id="a")
    b = gr.Number(value=2, label="b", elem_id="b")
    button = gr.Button("Multiply", elem_id="multiply")
    result = gr.Textbox(label="result", elem_id="result")
    button.click(multiply, [a, b], result)

# Address, port and root path come from GRADIO_SERVER_NAME, GRADIO_SERVER_PORT and
# GRADIO_ROOT_PATH, which the tests set per container.
demo.launch()
