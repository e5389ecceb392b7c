/* placeholder: replaced by the fakexen implementation */
