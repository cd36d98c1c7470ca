"""covidxray: COVID-19 detection in chest X-rays, as a reproducible, experiment-tracked pipeline."""

__version__ = "0.1.0"


class CovidXrayError(Exception):
    """A problem with the user's input (file, checksum, config value): reported in one line, exit 1."""
