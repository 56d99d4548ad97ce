"""The web console's files (page, script, styles, vendored libraries with their
licences, the bundled world outline): package data served by
citynode/transport/api_console.py at ``/``. No code runs from here."""
