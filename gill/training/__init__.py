"""Training GILL's adapters on CC3M-format caption-image pairs (``gill train``, ``gill train-decision``)."""
