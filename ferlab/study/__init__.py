"""ferlab.study."""
