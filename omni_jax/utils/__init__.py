"""Small shared utilities (the file-system layer)."""
