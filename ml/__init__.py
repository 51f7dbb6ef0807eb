"""The classifier: preprocessing, DenseNet169 model, training, evaluation, Grad-CAM, runtime."""
