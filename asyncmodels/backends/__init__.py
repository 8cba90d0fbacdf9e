"""Backends that plug asyncmodels into other frameworks: ``tasks`` serves Django's tasks framework."""
