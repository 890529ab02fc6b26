"""Labelled data: label sets, discovering samples, leak-free splits, cell crops cut from annotated
fields, and generated smear archives for the demo and the tests."""
