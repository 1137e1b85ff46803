"""The cases of tests/test_constrained_smollm2.py: JSON schemas, regexes, GBNF grammars with
their Lark equivalents, choice lists and stop-string cases, each with the instruction that
asks SmolLM2 for it."""

# ---- JSON schemas: (name, instruction, schema) ----

LONG_KEYS = {
    "type": "object",
    "properties": {
        "customer_identification_number": {"type": "integer", "minimum": 0, "maximum": 9999},
        "preferred_communication_channel": {"enum": ["email_notification", "sms_text_message",
                                                     "postal_mail_delivery"]},
        "account_creation_calendar_year": {"type": "integer", "minimum": 2000, "maximum": 2025},
        "customer_satisfaction_rating_out_of_five": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["customer_identification_number", "preferred_communication_channel",
                 "account_creation_calendar_year", "customer_satisfaction_rating_out_of_five"],
    "additionalProperties": False,
}

SCHEMAS = [
    ("person", "Describe a fictional person (name, age, city) as JSON.", {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"type": "string", "minLength": 1, "maxLength": 20},
        },
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    }),
    ("product", "Give a product record as JSON: an id like ABC-1234, a price, whether it is in stock, some tags.", {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "price": {"type": "number", "minimum": 0, "maximum": 1000},
            "in_stock": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 12},
                     "minItems": 1, "maxItems": 3},
        },
        "required": ["id", "price", "in_stock"],
        "additionalProperties": False,
    }),
    ("event", "Describe a conference as JSON with its title, date and number of attendees.", {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 30},
            "date": {"type": "string", "format": "date"},
            "attendees": {"type": "integer", "minimum": 1, "maximum": 500},
        },
        "required": ["title", "date", "attendees"],
        "additionalProperties": False,
    }),
    ("nested_address", "Give a person with a postal address (street, city, 5-digit zip) as JSON.", {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 20},
            "address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string", "minLength": 1, "maxLength": 30},
                    "city": {"type": "string", "minLength": 1, "maxLength": 20},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                },
                "required": ["street", "city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    }),
    ("tshirt_order", "Order a T-shirt as JSON: colour, size and quantity.", {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue", "black"]},
            "size": {"enum": ["S", "M", "L", "XL"]},
            "quantity": {"type": "integer", "minimum": 1, "maximum": 10},
        },
        "required": ["color", "size", "quantity"],
        "additionalProperties": False,
    }),
    ("shopping_list", "Write a short shopping list as JSON: items with a name and a quantity.", {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "minItems": 2,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "minLength": 1, "maxLength": 15},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                    },
                    "required": ["name", "qty"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["items"],
        "additionalProperties": False,
    }),
    ("int_array", "List between three and five small integers as a JSON array.", {
        "type": "array",
        "items": {"type": "integer", "minimum": -10, "maximum": 10},
        "minItems": 3,
        "maxItems": 5,
    }),
    ("weather", "Report today's weather as JSON: temperature in Celsius, condition, humidity percent.", {
        "type": "object",
        "properties": {
            "temperature_c": {"type": "number", "minimum": -50, "maximum": 60},
            "condition": {"type": "string", "enum": ["sunny", "cloudy", "rainy", "snowy"]},
            "humidity": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "required": ["temperature_c", "condition", "humidity"],
        "additionalProperties": False,
    }),
    ("account", "Create a user account as JSON: username, email, whether it is active, and roles.", {
        "type": "object",
        "properties": {
            "username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,11}$"},
            "email": {"type": "string", "format": "email", "maxLength": 40},
            "active": {"type": "boolean"},
            "roles": {"type": "array", "items": {"enum": ["admin", "editor", "viewer"]},
                      "minItems": 1, "maxItems": 3},
        },
        "required": ["username", "email", "active", "roles"],
        "additionalProperties": False,
    }),
    ("book", "Describe a book as JSON: title, author (first and last name), year, genres, and optionally its ISBN.", {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 40},
            "author": {
                "type": "object",
                "properties": {"first": {"type": "string", "minLength": 1, "maxLength": 15},
                               "last": {"type": "string", "minLength": 1, "maxLength": 15}},
                "required": ["first", "last"],
                "additionalProperties": False,
            },
            "year": {"type": "integer", "minimum": 1450, "maximum": 2025},
            "isbn": {"type": "string", "pattern": "^97[89]-[0-9]{10}$"},
            "genres": {"type": "array", "items": {"enum": ["fiction", "science", "history", "poetry"]},
                       "minItems": 1, "maxItems": 2},
        },
        "required": ["title", "author", "year", "genres"],
        "additionalProperties": False,
    }),
    ("server", "Describe a server as JSON: hostname, IPv4 address, port and a UUID.", {
        "type": "object",
        "properties": {
            "hostname": {"type": "string", "pattern": "^[a-z]{3,10}[0-9]{2}$"},
            "ip": {"type": "string", "format": "ipv4"},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "id": {"type": "string", "format": "uuid"},
        },
        "required": ["hostname", "ip", "port", "id"],
        "additionalProperties": False,
    }),
    ("matrix", "Give a 2x2 matrix of digits as JSON.", {
        "type": "object",
        "properties": {
            "matrix": {"type": "array", "minItems": 2, "maxItems": 2,
                       "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                 "items": {"type": "integer", "minimum": 0, "maximum": 9}}},
        },
        "required": ["matrix"],
        "additionalProperties": False,
    }),
    ("status_union", "Report the status of a task as JSON: a result (a number or a short word) and an optional note.", {
        "type": "object",
        "properties": {
            "status": {"const": "ok"},
            "result": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100},
                                 {"type": "string", "minLength": 1, "maxLength": 10}]},
            "note": {"type": ["string", "null"], "maxLength": 20},
        },
        "required": ["status", "result"],
        "additionalProperties": False,
    }),
    ("long_keys", "Record a customer's details as JSON.", LONG_KEYS),
]

# ---- regexes: (name, instruction, pattern) ----

OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
REGEXES = [
    ("ipv4", "What is the IP address of a home router?", rf"({OCTET}\.){{3}}{OCTET}"),
    ("iso_date", "When did the first Moon landing happen? Give the date.", r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
    ("phone", "Give a US phone number.", r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}"),
    ("yes_no", "Is the sky blue? Answer yes or no.", r"(yes|no)"),
    ("email", "Give an email address for John Smith.", r"[a-z]{1,10}\.[a-z]{1,10}@[a-z]{2,10}\.(com|org|net)"),
    ("hex_colour", "What is the hex code of the colour red?", r"#[0-9a-fA-F]{6}"),
    ("time", "What time is lunch? Answer as HH:MM.", r"([01][0-9]|2[0-3]):[0-5][0-9]"),
    ("name_age", "Introduce a person with their name and age.", r"Name: [A-Z][a-z]{1,15}\nAge: [0-9]{1,2}"),
    ("us_zip", "What is a ZIP code in New York?", r"[0-9]{5}(-[0-9]{4})?"),
    ("semver", "What version is the latest Python release?", r"v?(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})"),
    ("sentence", "Write one short sentence about cats.", r"[A-Z][a-z]{1,12}( [a-z]{1,12}){2,6}\."),
    ("price", "How much does a cup of coffee cost?", r"\$[0-9]{1,4}\.[0-9]{2}"),
    ("code_digits", "Give a passport number: two capital letters and six digits.", r"[A-Z]{2}\d{6}"),
]

# ---- EBNF (GBNF) grammars and their independent Lark equivalents ----

ARITH_GBNF = r'''root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= number | "(" expr ")"
number ::= [1-9] [0-9]{0,2} | "0"
'''
ARITH_LARK = r'''
start: expr
expr: term (ADDOP term)~0..3
term: factor (MULOP factor)~0..2
factor: NUMBER | "(" expr ")"
ADDOP: "+" | "-"
MULOP: "*" | "/"
NUMBER: /[1-9][0-9]{0,2}|0/
'''
SQL_GBNF = r'''root ::= "SELECT " columns " FROM " table " WHERE " column " = " value
columns ::= "*" | column (", " column){0,3}
column ::= "id" | "name" | "age" | "city" | "email"
table ::= "users" | "customers" | "orders"
value ::= [0-9]{1,4} | "'" [A-Za-z ]{1,16} "'"
'''
SQL_LARK = r'''
start: "SELECT " columns " FROM " TABLE " WHERE " COLUMN " = " value
columns: "*" | COLUMN (", " COLUMN)~0..3
COLUMN: "id" | "name" | "age" | "city" | "email"
TABLE: "users" | "customers" | "orders"
value: NUMBER | STRING
NUMBER: /[0-9]{1,4}/
STRING: /'[A-Za-z ]{1,16}'/
'''
GRAMMARS = [
    ("arith", "Write an arithmetic expression that equals 10.", ARITH_GBNF, ARITH_LARK),
    ("sql", "Write an SQL query that selects the names of users who live in Paris.", SQL_GBNF, SQL_LARK),
]

# ---- choices ----

CHOICES = [
    ("capital", "What is the capital of France?", ["London", "Paris", "Berlin", "Madrid", "Rome"]),
    ("prefixes", "Do you like ice cream?", ["yes", "yes, definitely", "no", "not sure"]),
    ("sentences", "Pick a sentence.", ["The quick brown fox jumps over the lazy dog.",
                                      "A journey of a thousand miles begins with a single step.",
                                      "To be or not to be, that is the question."]),
]

# ---- n > 1 and stop strings combined with a grammar ----

N_BRANCHES = 3
NAME_AGE = r"Name: [A-Z][a-z]{1,15}\nAge: [0-9]{1,2}"
STOP_CASES = [  # (name, instruction, regex, stop, the part before the stop must full-match this, or None)
    # The grammar forces the stop string: the output ends just before it.
    ("stop_forced_newline", "Introduce a person with their name and age.", NAME_AGE, "\n", r"Name: [A-Z][a-z]{1,15}"),
    ("stop_forced_dot", "What is the IP address of a home router?", rf"({OCTET}\.){{3}}{OCTET}", ".", OCTET),
    # A stop string the grammar never allows: the output is complete.
    ("stop_impossible", "Give a US phone number.", r"\([0-9]{3}\) [0-9]{3}-[0-9]{4}", "xyz", None),
]
CUT_LENGTH = 20
CUT_STOP = "communication"  # inside the forced key "preferred_communication_channel"
