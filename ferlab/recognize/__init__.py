"""ferlab.recognize."""
