"""ferlab: facial expression recognition, from FER2013 to real photos."""

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, ...] = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
