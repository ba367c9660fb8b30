"""osteoplan: CT bone-metastasis segmentation, lesion-to-canal distance and per-lesion plans.

Decision support for interventional radiologists, not a medical device.
"""

__version__ = "0.1.0"

DISCLAIMER = (
    "Decision support only, not a medical device. osteoplan's segmentation, measurements and "
    "recommendations must be reviewed by a qualified interventional radiologist before any clinical use."
)
