"""The offline demo's URIs: the default dataset and model every stage's config names (the data and weights
themselves live in `jobs.preprocessing.demo` and `jobs.demo_model`)."""

DEMO_MODEL_URI = "demo:gemma3-270m"
DEMO_URI = "demo:stdlib-docs"  # instruction pairs from the standard library's docstrings
DEMO_TEXT_URI = "demo:python-docs"  # raw text for continued pre-training: the reference topics pydoc ships
