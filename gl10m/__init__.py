"""gl10m: GL-10M-style paired Sentinel-2 / NAIP datasets from OpenStreetMap concepts."""
__version__ = "0.1.0"
