"""Class map of the classifier (importable without Keras/TensorFlow)."""

CLASSES: tuple[str, ...] = ("COVID", "Normal", "Other")
CLASS_DESCRIPTIONS = {
    "COVID": "COVID-19",
    "Normal": "normal",
    "Other": "other (non-COVID) lung disease",
}
# what every output says for a verdict (SC, SR, HL7 result, web console): a triage
# suspicion, not a diagnosis
VERDICT_TEXT: dict[str, str] = {
    "COVID": "COVID-19 suspected",
    "Normal": "Normal",
    "Other": "Other lung disease",
}
