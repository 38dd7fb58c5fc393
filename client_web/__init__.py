"""The browser page (index.html, app.js, style.css), shipped as package data.

A package only so that importlib.resources can find the page in every kind of install (wheel, editable,
source tree): ``server.settings.default_client_dir`` looks it up here. There is no Python code in it.
"""
