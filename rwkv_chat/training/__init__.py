"""Training tools for the embedded demo model (not imported by the runtime).

``rwkv7``: a small pure-torch RWKV-7 for training, exporting the official checkpoint layout.
``data``: conversational corpus preparation. ``demo``: locating the shipped demo model.
"""
