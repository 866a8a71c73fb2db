//! ClickHouse column types: parsing, the cast each needs in the SELECT so that ClickHouse's
//! Arrow output is lossless and readable by every Iceberg reader, and the Iceberg type.
//!
//! | ClickHouse | SELECT expression | Iceberg |
//! |---|---|---|
//! | Int8, Int16, UInt8, UInt16, Int32 | `toInt32(c)` | int |
//! | UInt32, Int64 | `toInt64(c)` | long |
//! | UInt64 | `toDecimal128(c, 0)` (no silent overflow) | decimal(20,0) |
//! | UInt64 with `uint64 = "long"` | `accurateCast(c, 'Int64')` (overflow fails the query) | long |
//! | Float32 / Float64 | as is | float / double |
//! | Decimal(P,S), P ≤ 38 | as is | decimal(P,S) |
//! | String, LowCardinality(String) | as is | string |
//! | FixedString(N) | as is | fixed(N) |
//! | Enum8/16, UUID, IPv4/6 | `toString(c)` (labels, canonical text) | string |
//! | Bool | as is | boolean |
//! | Date, Date32 | as is | date |
//! | DateTime[(tz)], DateTime64(p[, tz]) | `toDateTime64(c, 6, 'UTC')` (the instant) | timestamptz (µs) |
//! | Array(T) | `arrayMap(x -> cast(x), c)` | list |
//! | Map(K, V) | `mapApply((k, v) -> (cast(k), cast(v)), c)` | map |
//! | Nullable(T) | cast of T | optional field |

use iceberg::spec::{ListType, MapType, NestedField, PrimitiveType, Type};

use crate::config::Uint64As;

#[derive(Debug, Clone, PartialEq)]
pub enum ChType {
    Int(u8),
    UInt(u8),
    Float32,
    Float64,
    Decimal { precision: u32, scale: u32 },
    String,
    FixedString(u64),
    Uuid,
    Bool,
    Date,
    Date32,
    DateTime,
    DateTime64(u32),
    Enum,
    Ip,
    Nullable(Box<ChType>),
    LowCardinality(Box<ChType>),
    Array(Box<ChType>),
    Map(Box<ChType>, Box<ChType>),
    Unsupported(String),
}

impl ChType {
    pub fn parse(text: &str) -> ChType {
        let t = text.trim();
        let (name, args) = match t.find('(') {
            Some(open) if t.ends_with(')') => (&t[..open], split_args(&t[open + 1..t.len() - 1])),
            _ => (t, vec![]),
        };
        let arg_u32 = |i: usize| args.get(i).and_then(|a| a.trim().parse::<u32>().ok());
        match (name, args.len()) {
            ("Int8", 0) => ChType::Int(8),
            ("Int16", 0) => ChType::Int(16),
            ("Int32", 0) => ChType::Int(32),
            ("Int64", 0) => ChType::Int(64),
            ("UInt8", 0) => ChType::UInt(8),
            ("UInt16", 0) => ChType::UInt(16),
            ("UInt32", 0) => ChType::UInt(32),
            ("UInt64", 0) => ChType::UInt(64),
            ("Float32", 0) => ChType::Float32,
            ("Float64", 0) => ChType::Float64,
            ("Decimal", 2) => match (arg_u32(0), arg_u32(1)) {
                (Some(p), Some(s)) if p <= 38 => ChType::Decimal { precision: p, scale: s },
                _ => ChType::Unsupported(t.into()),
            },
            ("Decimal32", 1) => {
                arg_u32(0).map(|s| ChType::Decimal { precision: 9, scale: s }).unwrap_or(ChType::Unsupported(t.into()))
            }
            ("Decimal64", 1) => {
                arg_u32(0).map(|s| ChType::Decimal { precision: 18, scale: s }).unwrap_or(ChType::Unsupported(t.into()))
            }
            ("Decimal128", 1) => {
                arg_u32(0).map(|s| ChType::Decimal { precision: 38, scale: s }).unwrap_or(ChType::Unsupported(t.into()))
            }
            ("String", 0) => ChType::String,
            ("FixedString", 1) => {
                args[0].trim().parse().map(ChType::FixedString).unwrap_or(ChType::Unsupported(t.into()))
            }
            ("UUID", 0) => ChType::Uuid,
            ("Bool", 0) => ChType::Bool,
            ("Date", 0) => ChType::Date,
            ("Date32", 0) => ChType::Date32,
            ("DateTime", 0 | 1) => ChType::DateTime,
            ("DateTime64", 1 | 2) => {
                arg_u32(0).filter(|p| *p <= 9).map(ChType::DateTime64).unwrap_or(ChType::Unsupported(t.into()))
            }
            ("Enum8" | "Enum16", _) => ChType::Enum,
            ("IPv4" | "IPv6", 0) => ChType::Ip,
            ("Nullable", 1) => ChType::Nullable(Box::new(ChType::parse(&args[0]))),
            ("LowCardinality", 1) => ChType::LowCardinality(Box::new(ChType::parse(&args[0]))),
            ("Array", 1) => ChType::Array(Box::new(ChType::parse(&args[0]))),
            ("Map", 2) => ChType::Map(Box::new(ChType::parse(&args[0])), Box::new(ChType::parse(&args[1]))),
            _ => ChType::Unsupported(t.into()),
        }
    }

    /// The type without Nullable / LowCardinality wrappers, and whether it is nullable.
    pub fn unwrap(&self) -> (&ChType, bool) {
        match self {
            ChType::Nullable(inner) => (inner.unwrap().0, true),
            ChType::LowCardinality(inner) => inner.unwrap(),
            other => (other, false),
        }
    }

    /// Whether the type can serve as the window cursor (a point in time).
    pub fn is_time(&self) -> bool {
        matches!(self.unwrap().0, ChType::Date | ChType::Date32 | ChType::DateTime | ChType::DateTime64(_))
    }

    /// Whether the type can serve as the tiebreak (totally ordered, exact).
    pub fn is_tiebreak(&self) -> bool {
        matches!(
            self.unwrap().0,
            ChType::Int(_)
                | ChType::UInt(_)
                | ChType::String
                | ChType::FixedString(_)
                | ChType::Uuid
                | ChType::Decimal { .. }
        )
    }

    /// The SQL expression reading `expr` of this type, and the Iceberg type it becomes.
    /// `ids` hands out field ids for nested types (the catalog reassigns them at creation).
    pub fn mapping(&self, expr: &str, depth: usize, ids: &mut i32, uint64: Uint64As) -> Result<(String, Type), String> {
        let (ty, nullable) = self.unwrap();
        let prim = |p: PrimitiveType| Type::Primitive(p);
        Ok(match ty {
            ChType::Int(8 | 16 | 32) | ChType::UInt(8 | 16) => {
                let e = if matches!(ty, ChType::Int(32)) { expr.to_string() } else { format!("toInt32({expr})") };
                (e, prim(PrimitiveType::Int))
            }
            ChType::Int(64) => (expr.to_string(), prim(PrimitiveType::Long)),
            ChType::UInt(32) => (format!("toInt64({expr})"), prim(PrimitiveType::Long)),
            ChType::UInt(64) => match uint64 {
                Uint64As::Decimal => {
                    (format!("toDecimal128({expr}, 0)"), prim(PrimitiveType::Decimal { precision: 20, scale: 0 }))
                }
                Uint64As::Long => {
                    let to = if nullable { "Nullable(Int64)" } else { "Int64" };
                    (format!("accurateCast({expr}, '{to}')"), prim(PrimitiveType::Long))
                }
            },
            ChType::Float32 => (expr.to_string(), prim(PrimitiveType::Float)),
            ChType::Float64 => (expr.to_string(), prim(PrimitiveType::Double)),
            ChType::Decimal { precision, scale } => {
                (expr.to_string(), prim(PrimitiveType::Decimal { precision: *precision, scale: *scale }))
            }
            ChType::String => (expr.to_string(), prim(PrimitiveType::String)),
            ChType::FixedString(n) => (expr.to_string(), prim(PrimitiveType::Fixed(*n))),
            ChType::Uuid | ChType::Enum | ChType::Ip => (format!("toString({expr})"), prim(PrimitiveType::String)),
            ChType::Bool => (expr.to_string(), prim(PrimitiveType::Boolean)),
            ChType::Date | ChType::Date32 => (format!("toDate32({expr})"), prim(PrimitiveType::Date)),
            ChType::DateTime | ChType::DateTime64(_) => {
                (format!("toDateTime64({expr}, 6, 'UTC')"), prim(PrimitiveType::Timestamptz))
            }
            ChType::Array(elem) => {
                let var = format!("x{depth}");
                let (inner, elem_type) = elem.mapping(&var, depth + 1, ids, uint64)?;
                *ids += 1;
                let field = if elem.unwrap().1 {
                    NestedField::list_element(*ids, elem_type, false)
                } else {
                    NestedField::list_element(*ids, elem_type, true)
                };
                let e = if inner == var { expr.to_string() } else { format!("arrayMap({var} -> {inner}, {expr})") };
                (e, Type::List(ListType { element_field: field.into() }))
            }
            ChType::Map(k, v) => {
                let (kv, vv) = (format!("k{depth}"), format!("v{depth}"));
                let (ke, kt) = k.mapping(&kv, depth + 1, ids, uint64)?;
                let (ve, vt) = v.mapping(&vv, depth + 1, ids, uint64)?;
                *ids += 2;
                let key = NestedField::map_key_element(*ids - 1, kt);
                let value = NestedField::map_value_element(*ids, vt, !v.unwrap().1);
                let e = if ke == kv && ve == vv {
                    expr.to_string()
                } else {
                    format!("mapApply(({kv}, {vv}) -> ({ke}, {ve}), {expr})")
                };
                (e, Type::Map(MapType { key_field: key.into(), value_field: value.into() }))
            }
            ChType::Unsupported(t) => return Err(format!("type {t} is not supported")),
            ChType::Int(_) | ChType::UInt(_) => return Err(format!("type {ty:?} is not supported")),
            ChType::Nullable(_) | ChType::LowCardinality(_) => unreachable!("unwrapped above"),
        })
    }
}

/// Splits type arguments at top-level commas, respecting parentheses and quotes.
fn split_args(s: &str) -> Vec<String> {
    let mut out = vec![];
    let mut depth = 0i32;
    let mut quote = false;
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quote => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                continue;
            }
            '\'' => quote = !quote,
            '(' if !quote => depth += 1,
            ')' if !quote => depth -= 1,
            ',' if !quote && depth == 0 => {
                out.push(cur.trim().to_string());
                cur.clear();
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        out.push(cur.trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(t: &str) -> (String, Type) {
        ChType::parse(t).mapping("c", 0, &mut 100, Uint64As::Decimal).unwrap()
    }

    #[test]
    fn uint64_as_long_is_a_checked_cast() {
        let long = |t: &str| ChType::parse(t).mapping("c", 0, &mut 100, Uint64As::Long).unwrap();
        assert_eq!(long("UInt64"), ("accurateCast(c, 'Int64')".into(), Type::Primitive(PrimitiveType::Long)));
        assert_eq!(long("LowCardinality(Nullable(UInt64))").0, "accurateCast(c, 'Nullable(Int64)')");
        assert_eq!(long("Array(Nullable(UInt64))").0, "arrayMap(x0 -> accurateCast(x0, 'Nullable(Int64)'), c)");
        assert_eq!(long("UInt32").0, "toInt64(c)", "only UInt64 changes");
    }

    #[test]
    fn parses_wrappers_and_args() {
        assert_eq!(ChType::parse("LowCardinality(Nullable(String))").unwrap(), (&ChType::String, true));
        assert_eq!(ChType::parse("DateTime64(3, 'Asia/Tokyo')"), ChType::DateTime64(3));
        assert_eq!(ChType::parse("Enum8('a, b' = 1, 'c' = 2)"), ChType::Enum);
        assert_eq!(
            ChType::parse("Map(String, Array(Nullable(UInt8)))"),
            ChType::Map(
                Box::new(ChType::String),
                Box::new(ChType::Array(Box::new(ChType::Nullable(Box::new(ChType::UInt(8))))))
            )
        );
        assert!(matches!(ChType::parse("Tuple(a Int8)"), ChType::Unsupported(_)));
        assert!(matches!(ChType::parse("Decimal(76, 2)"), ChType::Unsupported(_)));
    }

    #[test]
    fn casts_are_lossless() {
        assert_eq!(map("UInt64").0, "toDecimal128(c, 0)");
        assert_eq!(map("UInt64").1, Type::Primitive(PrimitiveType::Decimal { precision: 20, scale: 0 }));
        assert_eq!(map("DateTime64(3)").0, "toDateTime64(c, 6, 'UTC')");
        assert_eq!(map("Decimal(18, 8)").1, Type::Primitive(PrimitiveType::Decimal { precision: 18, scale: 8 }));
        assert_eq!(map("Array(Enum8('x' = 1))").0, "arrayMap(x0 -> toString(x0), c)");
        assert_eq!(map("Array(String)").0, "c");
        assert_eq!(map("Map(String, UInt64)").0, "mapApply((k0, v0) -> (k0, toDecimal128(v0, 0)), c)");
    }

    #[test]
    fn cursor_and_tiebreak_types() {
        assert!(ChType::parse("DateTime64(3)").is_time());
        assert!(ChType::parse("Nullable(DateTime)").is_time());
        assert!(!ChType::parse("String").is_time());
        assert!(ChType::parse("UInt64").is_tiebreak());
        assert!(!ChType::parse("Float64").is_tiebreak());
    }
}
