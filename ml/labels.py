"""Class map of the classifier (importable without Keras/TensorFlow)."""

CLASSES: tuple[str, ...] = ("COVID", "Normal", "Other")
CLASS_DESCRIPTIONS = {
    "COVID": "COVID-19",
    "Normal": "normal",
    "Other": "other (non-COVID) lung disease",
}
