"""The MONAI Label app folder (``monailabel start_server --app <this folder>``); see ``main.py``."""
