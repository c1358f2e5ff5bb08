"""Thin widgets: each draws from plain data it is given and posts a small message when the user acts."""
