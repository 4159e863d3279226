"""JSON schemas of different shapes for the constrained-decoding tests (each has bounded strings and arrays,
so a small model's answer ends within a modest max_tokens)."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "minLength": 1, "maxLength": 16}

SCHEMAS: list[tuple[str, str, dict[str, Any]]] = [
    ("integer", "How old is a cat? Answer as JSON.", {"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 30}}, "required": ["age"], "additionalProperties": False}),
    ("bool", "Is the sky blue? Answer as JSON.", {"type": "object", "properties": {
        "answer": {"type": "boolean"}}, "required": ["answer"], "additionalProperties": False}),
    ("enum", "What colour is grass? Answer as JSON.", {"type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]}),
    ("person", "Describe a person as JSON.", {"type": "object", "properties": {
        "name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False}),
    ("nested", "Describe a city and its country as JSON.", {"type": "object", "properties": {
        "city": NAME, "country": {"type": "object", "properties": {"name": NAME, "code": {
            "type": "string", "pattern": "^[A-Z]{2}$"}}, "required": ["name", "code"],
            "additionalProperties": False}}, "required": ["city", "country"], "additionalProperties": False}),
    ("array", "List three fruits as JSON.", {"type": "object", "properties": {
        "fruits": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}}, "required": ["fruits"],
        "additionalProperties": False}),
    ("top-level array", "List two numbers.", {"type": "array", "items": {
        "type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 2}),
    ("bounded number", "Give a temperature in Celsius as JSON.", {"type": "object", "properties": {
        "celsius": {"type": "number", "minimum": -50, "maximum": 50}}, "required": ["celsius"],
        "additionalProperties": False}),
    ("exclusive bounds", "Pick a score between 1 and 10 as JSON.", {"type": "object", "properties": {
        "score": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 11}}, "required": ["score"],
        "additionalProperties": False}),
    ("optional", "Describe a book as JSON.", {"type": "object", "properties": {
        "title": NAME, "pages": {"type": "integer", "minimum": 1, "maximum": 2000}, "subtitle": NAME},
        "required": ["title"], "additionalProperties": False}),
    ("string only", "Say a greeting.", {"type": "string", "maxLength": 20}),
    ("const", "Answer as JSON.", {"type": "object", "properties": {
        "version": {"const": 2}, "ok": {"type": "boolean"}}, "required": ["version", "ok"],
        "additionalProperties": False}),
    ("anyOf", "Give an id as JSON.", {"type": "object", "properties": {
        "id": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 999}, {"type": "string", "maxLength": 8}]}},
        "required": ["id"], "additionalProperties": False}),
    ("nullable", "Give a middle name as JSON, or null.", {"type": "object", "properties": {
        "middle": {"type": ["string", "null"], "maxLength": 12}}, "required": ["middle"],
        "additionalProperties": False}),
    ("array of objects", "List two people as JSON.", {"type": "object", "properties": {
        "people": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"type": "object", "properties": {
            "name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["name", "age"], "additionalProperties": False}}},
        "required": ["people"], "additionalProperties": False}),
    ("enum array", "Which days are weekend days? JSON.", {"type": "object", "properties": {
        "days": {"type": "array", "items": {"enum": ["sat", "sun", "mon"]}, "minItems": 1, "maxItems": 2}},
        "required": ["days"], "additionalProperties": False}),
    ("pattern", "Give a date as JSON.", {"type": "object", "properties": {
        "date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}, "required": ["date"],
        "additionalProperties": False}),
    ("deep nesting", "Describe a company as JSON.", {"type": "object", "properties": {
        "company": {"type": "object", "properties": {"ceo": {"type": "object", "properties": {
            "name": NAME}, "required": ["name"], "additionalProperties": False}}, "required": ["ceo"],
            "additionalProperties": False}}, "required": ["company"], "additionalProperties": False}),
    ("defs and ref", "Give two points as JSON.", {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}}, "type": "object", "properties": {
        "a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}}, "required": ["a", "b"],
        "additionalProperties": False}),
    ("many fields", "Describe a car as JSON.", {"type": "object", "properties": {
        "make": NAME, "model": NAME, "year": {"type": "integer", "minimum": 1950, "maximum": 2030},
        "electric": {"type": "boolean"}, "doors": {"enum": [2, 4, 5]}},
        "required": ["make", "model", "year", "electric", "doors"], "additionalProperties": False}),
    ("oneOf-like enum of objects", "Pick a shape as JSON.", {"type": "object", "properties": {
        "shape": {"anyOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1,
                                                                                  "maximum": 9}},
             "required": ["kind", "r"], "additionalProperties": False},
            {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1,
                                                                                     "maximum": 9}},
             "required": ["kind", "side"], "additionalProperties": False}]}},
        "required": ["shape"], "additionalProperties": False}),
    ("integer array with bounds", "Give three dice rolls as JSON.", {"type": "object", "properties": {
        "rolls": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 6},
                  "minItems": 3, "maxItems": 3}}, "required": ["rolls"], "additionalProperties": False}),
]
