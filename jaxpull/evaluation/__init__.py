"""Evaluation: explainers behind one signature, faithfulness and sanity metrics, and the
pipeline that scores every explainer by every metric (``jaxpull evaluate``)."""
