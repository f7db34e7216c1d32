"""One module per command; each parses flags, calls the core and renders the result."""
