"""Training tools for the embedded demo model (not imported by the runtime).

``rwkv7``: a small pure-torch RWKV-7 for training, exporting the official checkpoint layout.
``data``: conversational corpus preparation. The shipped demo model is found and expanded by
``rwkv_chat.demo`` (runtime); the trainer writes it with ``rwkv_chat.demo.save_compact``.
"""
