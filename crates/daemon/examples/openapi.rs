//! Prints the API's OpenAPI document (the one `GET /openapi.json` serves); the copy in
//! docs/api/openapi.json is made with `cargo run -p daemon --example openapi > docs/api/openapi.json`.
fn main() {
    match daemon::api::openapi().to_pretty_json() {
        Ok(doc) => println!("{doc}"),
        Err(e) => {
            eprintln!("openapi: {e}");
            std::process::exit(1);
        }
    }
}
