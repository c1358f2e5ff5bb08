"""The chat screen and the modal screens (help, snapshot list)."""
