"""silomesh.peer."""
