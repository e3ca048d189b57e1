"""Pictures and HTML shared by every report (explain, audit, saliency, demo)."""
