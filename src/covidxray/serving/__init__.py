"""Serving: the MLflow pyfunc model (pyfunc) and loading a model for inference (loading).

Models registered before the move into sub-packages carry an entry file that runs
`from covidxray.serving import CovidXrayModel`. In a process that has already imported this
package, that import finds this module rather than the model's own copy of the code, so the class
is re-exported here, lazily (`import covidxray.serving.loading` does not load MLflow).
"""


def __getattr__(name: str):
    if name == "CovidXrayModel":
        from covidxray.serving.pyfunc import CovidXrayModel

        return CovidXrayModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
