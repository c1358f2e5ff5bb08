"""The Textual chat app. `make_app(session, ...)` builds it; `rwkv_chat.cli` runs it."""
