//! OpenAPI schemas (`utoipa`) of the config types whose JSON form is custom: sizes, serial
//! backends and MAC addresses are strings (sizes also plain byte counts).

use super::{ByteSize, MacAddr, SerialConfig};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Schema};

fn string(pattern: &str, description: &str, example: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .description(Some(description))
        .examples([example])
}

impl utoipa::PartialSchema for ByteSize {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
                    .minimum(Some(0))
                    .description(Some("bytes")),
            )
            .item(string(
                r"^\s*[0-9]+\s*([KkMmGgTt]([Ii]?[Bb])?|[Bb])?\s*$",
                "a number of bytes with an optional K, M, G or T suffix (binary multiples)",
                "512M",
            ))
            .description(Some(
                "A size: a number of bytes, or a string such as \"512M\" or \"2G\". Written \
                 back as a string.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for ByteSize {}

impl utoipa::PartialSchema for SerialConfig {
    fn schema() -> RefOr<Schema> {
        string(
            r"^(stdio|null|off|file=.+|socket=.+)$",
            "A console backend: stdio, null, file=PATH or socket=PATH.",
            "socket=/run/ferrovisor/vm1.console",
        )
        .into()
    }
}

impl utoipa::ToSchema for SerialConfig {}

impl utoipa::PartialSchema for MacAddr {
    fn schema() -> RefOr<Schema> {
        string(
            r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$",
            "A MAC address.",
            "02:00:00:00:00:01",
        )
        .into()
    }
}

impl utoipa::ToSchema for MacAddr {}
