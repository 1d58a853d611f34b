"""ferlab.serve: the local web demo and JSON API (``ferlab serve``).

``ferlab.serve.app.create_app(recognizer)`` builds the FastAPI app; ``uploads`` checks and decodes uploads in
memory; ``service`` runs detection, classification and the per-face overlays; ``static/`` holds the page.
Importing this package imports nothing heavy.
"""
