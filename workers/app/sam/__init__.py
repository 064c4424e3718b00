"""SAM and CloudFormation templates: their functions and event source mappings, run here.

`workers run|validate|invoke|dlq TEMPLATE --overrides FILE` load a template through
`load_template`; `workers sam convert` prints it as a native mapping file. The template format
and the SAM transform are aws-sam-translator's (the `sam` extra).
"""

from workers.app.sam.convert import Conversion, Notes, convert, load_template, render_yaml
from workers.app.sam.template import is_template

__all__ = ["Conversion", "Notes", "convert", "is_template", "load_template", "render_yaml"]
