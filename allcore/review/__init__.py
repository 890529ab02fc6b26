"""The review app's domain: analysing one uploaded field (``analysis``), the queue of flagged rows
of a scoring output and the corrections reviewers make (``queue``, ``corrections``), and GeoJSON
export (``geojson``). The web pages are in ``static/``; ``pipelines/review.py`` serves them with
Ray Serve. Nothing here imports Ray."""
