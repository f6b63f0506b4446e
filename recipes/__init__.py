"""Shipped recipes (YAML); `qelalora recipes list` shows them."""
