"""A config.toml that sets every section: the CLI config tests load it, the config fuzzer mutates it."""

FULL_CONFIG = """\
[model]
path = "~/models/m.pth"
strategy = "cpu fp32"

[chat]
user = "Bob"
assistant = "Alice"
preamble = "Be brief."
theme = "nord"

[sampling]
temperature = 0.7
top_p = 0.3
top_k = 20
token_ban = [0]
stop = ["\\n\\nUser"]

[keys]
temperature_up = "ctrl+up"
stop = "Escape, F10"  # spelled loosely: loads as "escape,f10"
"""
