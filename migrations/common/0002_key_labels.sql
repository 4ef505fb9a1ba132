-- Officer-set labels of a key, as a JSON object of string to string.
ALTER TABLE keys ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
