//! Points on the earth and the distances between them, for placing clients.
//!
//! Placement only needs to rank regions by how far they are from a client, so
//! a spherical earth is plenty: the haversine great-circle distance is within
//! about 0.5% of the ellipsoidal one, far less than the difference between
//! any two candidate regions. The radius is the mean earth radius (IUGG,
//! 6371.0088 km).
//!
//! Most requests carry coordinates (Cloudflare geolocates the client's IP);
//! some carry only a country. [`country_centroid`] turns that country into a
//! point. For large countries whose people are far from the geographic centre
//! (Russia, Canada, Australia, Brazil, China, ...) the table holds an
//! approximate *centre of population* instead, because the point stands in
//! for where a client most likely is, not for the middle of the map: the
//! geographic centre of Russia is in Siberia, nearer Tokyo than Frankfurt,
//! while most Russians are nearer Frankfurt.

use crate::math;

/// A position in degrees: latitude in [-90, 90], longitude in [-180, 180].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub lat: f64,
    pub lon: f64,
}

impl Point {
    /// A point, or `None` when a coordinate is not finite or out of range
    /// (client-supplied coordinates are validated here, once).
    pub fn new(lat: f64, lon: f64) -> Option<Point> {
        ((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon))
            .then_some(Point { lat, lon })
    }

    /// A point from its coordinates as text in decimal degrees, as the
    /// runtime gives a request's location (`"51.50740"`), surrounding
    /// whitespace allowed; `None` unless both are numbers in range.
    ///
    /// The numbers are read as JSON numbers, by the JSON parser the Worker
    /// carries anyway: Rust's own float parser and its tables were 14.7 KB of
    /// the gzipped module. So a leading `+` or `.`, a trailing `.`, a leading
    /// zero (`05.1`), `inf` and `NaN` are refused, none of which the runtime
    /// writes; and a result may be a unit in the last place off the nearest
    /// `f64`, some nanometres on the ground.
    pub fn parse(lat: &str, lon: &str) -> Option<Point> {
        let number = |text: &str| serde_json::from_str::<f64>(text.trim()).ok();
        Point::new(number(lat)?, number(lon)?)
    }
}

/// Where Cloudflare may place a Durable Object (its `locationHint`s), each
/// with a few of the cities its data centres serve: a region's objects are
/// hinted to the hint of the city nearest it ([`location_hint`]).
const LOCATION_HINTS: &[(&str, f64, f64)] = &[
    ("wnam", 37.34, -121.89), // San Jose
    ("wnam", 47.61, -122.33), // Seattle
    ("wnam", 34.05, -118.24), // Los Angeles
    ("enam", 38.95, -77.45),  // Ashburn
    ("enam", 41.88, -87.63),  // Chicago
    ("enam", 40.71, -74.01),  // New York
    ("enam", 25.76, -80.19),  // Miami
    ("sam", -23.55, -46.63),  // São Paulo
    ("sam", -33.45, -70.67),  // Santiago
    ("sam", -12.05, -77.04),  // Lima
    ("weur", 51.51, -0.13),   // London
    ("weur", 48.86, 2.35),    // Paris
    ("weur", 50.11, 8.68),    // Frankfurt
    ("eeur", 52.23, 21.01),   // Warsaw
    ("eeur", 44.43, 26.10),   // Bucharest
    ("apac", 1.35, 103.82),   // Singapore
    ("apac", 35.68, 139.69),  // Tokyo
    ("apac", 19.08, 72.88),   // Mumbai
    ("apac", 22.32, 114.17),  // Hong Kong
    ("oc", -33.87, 151.21),   // Sydney
    ("oc", -36.85, 174.76),   // Auckland
    ("afr", -26.20, 28.05),   // Johannesburg
    ("afr", 6.52, 3.38),      // Lagos
    ("afr", -1.29, 36.82),    // Nairobi
    ("me", 25.20, 55.27),     // Dubai
    ("me", 32.09, 34.78),     // Tel Aviv
];

/// The Durable Object `locationHint` for objects that serve a region at `p`:
/// the hint of the listed city nearest it. An object is placed when it is
/// first called, near its caller unless hinted; a region's admission gates
/// first called by an operator's change or the cron, from anywhere, would
/// otherwise stay far from the region's clients for good.
pub fn location_hint(p: Point) -> &'static str {
    let from = Origin::new(p);
    LOCATION_HINTS
        .iter()
        .map(|&(hint, lat, lon)| (hint, from.distance_km(Point { lat, lon })))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or("weur", |(hint, _)| hint)
}

/// The mean earth radius (IUGG), in kilometres.
pub const EARTH_RADIUS_KM: f64 = 6371.0088;

/// The great-circle distance between two points, in kilometres (haversine).
///
/// Symmetric, zero for equal points, at most half the circumference
/// (~20,015 km, antipodes). Well-conditioned for nearby points, which is
/// where the ranking of regions is decided.
pub fn distance_km(a: Point, b: Point) -> f64 {
    Origin::new(a).distance_km(b)
}

/// A point that many distances are measured from (a client, against every
/// region), with its share of [`distance_km`]'s work done once. Its
/// distances are bit for bit [`distance_km`]'s: the same operations on the
/// same values.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    point: Point,
    lat: f64,
    cos_lat: f64,
}

impl Origin {
    pub fn new(point: Point) -> Origin {
        let lat = point.lat.to_radians();
        Origin {
            point,
            lat,
            cos_lat: math::cos(lat),
        }
    }

    /// The great-circle distance to `b`, in kilometres (haversine).
    pub fn distance_km(&self, b: Point) -> f64 {
        let lat2 = b.lat.to_radians();
        let half_dlat = (lat2 - self.lat) / 2.0;
        let half_dlon = (b.lon - self.point.lon).to_radians() / 2.0;
        let h = math::sin(half_dlat).powi(2)
            + self.cos_lat * math::cos(lat2) * math::sin(half_dlon).powi(2);
        // Rounding can push h a hair above 1 near the antipodes; asin would then
        // be NaN, and a NaN distance would poison every comparison after it.
        2.0 * EARTH_RADIUS_KM * math::asin(h.sqrt().min(1.0))
    }
}

/// A point as a unit vector from the earth's centre (x towards 0°N 0°E, z
/// towards the north pole), for comparing distances with [`chord2`].
pub fn unit_vector(p: Point) -> [f64; 3] {
    let (lat, lon) = (p.lat.to_radians(), p.lon.to_radians());
    let (sin_lat, cos_lat) = (math::sin(lat), math::cos(lat));
    let (sin_lon, cos_lon) = (math::sin(lon), math::cos(lon));
    [cos_lat * cos_lon, cos_lat * sin_lon, sin_lat]
}

/// The squared straight-line distance between two [`unit_vector`]s: for a
/// central angle θ it is 4·sin²(θ/2), four times the haversine's `h`. It
/// grows with the great-circle distance, so it ranks points the same way
/// (up to rounding, about 1e-14) without a single trigonometric call.
pub fn chord2(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    let (dx, dy, dz) = (a[0] - b[0], a[1] - b[1], a[2] - b[2]);
    dx * dx + dy * dy + dz * dz
}

/// Approximate centre of a country (ISO 3166-1 alpha-2, uppercase), for
/// clients whose request carries a country but no coordinates. `None` for a
/// country not in the table, and for Cloudflare's non-country codes (`XX`
/// unknown, `T1` Tor).
///
/// The table covers about 150 countries and territories: every country of
/// more than about 6 million people, every country of the seed regions (DE
/// GB US BR JP SG ZA), and some smaller ones. Codes are matched
/// case-insensitively (Cloudflare sends uppercase; being lenient costs
/// nothing) without allocating.
pub fn country_centroid(code: &str) -> Option<Point> {
    let &[a, b] = code.as_bytes() else {
        return None;
    };
    let key = [a.to_ascii_uppercase(), b.to_ascii_uppercase()];
    CENTROIDS
        .binary_search_by(|(c, _, _)| c.as_bytes().cmp(&key[..]))
        .ok()
        .map(|i| {
            let (_, lat, lon) = CENTROIDS[i];
            Point { lat, lon }
        })
}

/// (code, latitude, longitude), sorted by code for binary search. Degrees to
/// 0.1, as estimates good to within about a hundred kilometres: plenty for a
/// stand-in for a client's position, with regions hundreds of kilometres
/// apart. Where population is concentrated far from the geographic centre,
/// the point is the approximate centre of population (see the module docs).
const CENTROIDS: &[(&str, f64, f64)] = &[
    ("AE", 24.9, 55.0),   // United Arab Emirates
    ("AF", 34.0, 67.5),   // Afghanistan
    ("AL", 41.2, 19.9),   // Albania
    ("AM", 40.2, 44.6),   // Armenia
    ("AO", -11.2, 17.9),  // Angola
    ("AR", -34.0, -61.5), // Argentina
    ("AT", 47.6, 14.1),   // Austria
    ("AU", -32.9, 144.3), // Australia
    ("AZ", 40.3, 47.7),   // Azerbaijan
    ("BA", 44.0, 17.8),   // Bosnia and Herzegovina
    ("BD", 23.7, 90.4),   // Bangladesh
    ("BE", 50.7, 4.5),    // Belgium
    ("BF", 12.2, -1.6),   // Burkina Faso
    ("BG", 42.7, 25.5),   // Bulgaria
    ("BH", 26.1, 50.6),   // Bahrain
    ("BI", -3.4, 29.9),   // Burundi
    ("BJ", 9.3, 2.3),     // Benin
    ("BO", -17.0, -65.5), // Bolivia
    ("BR", -18.0, -46.5), // Brazil
    ("BW", -23.5, 25.5),  // Botswana
    ("BY", 53.7, 28.0),   // Belarus
    ("CA", 46.5, -86.0),  // Canada
    ("CD", -4.0, 21.8),   // DR Congo
    ("CF", 5.0, 19.0),    // Central African Republic
    ("CG", -4.2, 13.5),   // Republic of the Congo
    ("CH", 46.8, 8.2),    // Switzerland
    ("CI", 7.5, -5.5),    // Ivory Coast
    ("CL", -34.0, -71.0), // Chile
    ("CM", 5.5, 11.5),    // Cameroon
    ("CN", 32.5, 113.5),  // China
    ("CO", 4.6, -74.3),   // Colombia
    ("CR", 9.9, -84.0),   // Costa Rica
    ("CU", 21.5, -77.8),  // Cuba
    ("CY", 35.0, 33.2),   // Cyprus
    ("CZ", 49.8, 15.5),   // Czechia
    ("DE", 51.2, 10.4),   // Germany
    ("DK", 55.9, 10.5),   // Denmark
    ("DO", 18.7, -70.2),  // Dominican Republic
    ("DZ", 35.5, 3.0),    // Algeria
    ("EC", -1.8, -78.5),  // Ecuador
    ("EE", 59.0, 25.0),   // Estonia
    ("EG", 29.0, 31.0),   // Egypt
    ("ER", 15.3, 38.9),   // Eritrea
    ("ES", 40.2, -3.7),   // Spain
    ("ET", 9.1, 39.5),    // Ethiopia
    ("FI", 61.5, 25.0),   // Finland
    ("FR", 46.6, 2.4),    // France
    ("GB", 52.6, -1.5),   // United Kingdom
    ("GE", 42.0, 44.0),   // Georgia
    ("GH", 7.0, -1.2),    // Ghana
    ("GN", 10.0, -11.0),  // Guinea
    ("GR", 38.9, 22.8),   // Greece
    ("GT", 15.0, -90.5),  // Guatemala
    ("HK", 22.3, 114.2),  // Hong Kong
    ("HN", 14.8, -87.0),  // Honduras
    ("HR", 45.5, 16.0),   // Croatia
    ("HT", 18.9, -72.5),  // Haiti
    ("HU", 47.3, 19.3),   // Hungary
    ("ID", -4.5, 109.0),  // Indonesia
    ("IE", 53.3, -7.3),   // Ireland
    ("IL", 31.9, 34.9),   // Israel
    ("IN", 22.5, 80.0),   // India
    ("IQ", 33.2, 43.7),   // Iraq
    ("IR", 33.5, 52.0),   // Iran
    ("IT", 42.5, 12.6),   // Italy
    ("JM", 18.1, -77.2),  // Jamaica
    ("JO", 31.9, 36.0),   // Jordan
    ("JP", 35.8, 138.0),  // Japan
    ("KE", -0.5, 37.0),   // Kenya
    ("KG", 41.8, 73.5),   // Kyrgyzstan
    ("KH", 12.0, 104.9),  // Cambodia
    ("KP", 39.5, 126.5),  // North Korea
    ("KR", 37.0, 127.3),  // South Korea
    ("KW", 29.3, 47.8),   // Kuwait
    ("KZ", 47.0, 70.0),   // Kazakhstan
    ("LA", 18.5, 103.0),  // Laos
    ("LB", 33.9, 35.7),   // Lebanon
    ("LK", 7.3, 80.5),    // Sri Lanka
    ("LR", 6.5, -10.0),   // Liberia
    ("LT", 55.2, 24.0),   // Lithuania
    ("LV", 56.9, 24.5),   // Latvia
    ("LY", 32.0, 15.5),   // Libya
    ("MA", 33.0, -6.5),   // Morocco
    ("MD", 47.2, 28.5),   // Moldova
    ("MG", -19.0, 47.0),  // Madagascar
    ("ML", 13.5, -6.5),   // Mali
    ("MM", 19.5, 96.0),   // Myanmar
    ("MN", 47.5, 105.0),  // Mongolia
    ("MR", 18.0, -15.5),  // Mauritania
    ("MW", -14.0, 34.0),  // Malawi
    ("MX", 20.5, -100.5), // Mexico
    ("MY", 3.5, 102.5),   // Malaysia
    ("MZ", -18.0, 35.0),  // Mozambique
    ("NA", -22.0, 17.0),  // Namibia
    ("NE", 14.5, 7.0),    // Niger
    ("NG", 9.0, 7.5),     // Nigeria
    ("NI", 12.5, -85.8),  // Nicaragua
    ("NL", 52.1, 5.3),    // Netherlands
    ("NO", 60.5, 9.5),    // Norway
    ("NP", 27.9, 84.5),   // Nepal
    ("NZ", -39.0, 175.0), // New Zealand
    ("OM", 23.0, 57.5),   // Oman
    ("PA", 8.8, -79.8),   // Panama
    ("PE", -10.0, -76.0), // Peru
    ("PG", -6.0, 145.0),  // Papua New Guinea
    ("PH", 12.5, 122.0),  // Philippines
    ("PK", 30.0, 71.0),   // Pakistan
    ("PL", 52.0, 19.5),   // Poland
    ("PR", 18.2, -66.5),  // Puerto Rico
    ("PS", 31.9, 35.1),   // Palestine
    ("PT", 39.6, -8.4),   // Portugal
    ("PY", -25.5, -57.0), // Paraguay
    ("QA", 25.3, 51.3),   // Qatar
    ("RO", 45.9, 25.0),   // Romania
    ("RS", 44.2, 20.8),   // Serbia
    ("RU", 55.5, 50.0),   // Russia
    ("RW", -2.0, 29.9),   // Rwanda
    ("SA", 24.0, 45.0),   // Saudi Arabia
    ("SD", 13.5, 30.5),   // Sudan
    ("SE", 59.0, 16.0),   // Sweden
    ("SG", 1.35, 103.82), // Singapore
    ("SI", 46.1, 14.8),   // Slovenia
    ("SK", 48.7, 19.7),   // Slovakia
    ("SL", 8.5, -11.8),   // Sierra Leone
    ("SN", 14.5, -15.5),  // Senegal
    ("SO", 4.0, 45.0),    // Somalia
    ("SS", 7.0, 30.0),    // South Sudan
    ("SV", 13.7, -89.0),  // El Salvador
    ("SY", 35.0, 37.5),   // Syria
    ("TD", 11.0, 17.5),   // Chad
    ("TG", 8.0, 1.0),     // Togo
    ("TH", 14.5, 101.0),  // Thailand
    ("TJ", 38.9, 70.0),   // Tajikistan
    ("TM", 38.5, 59.0),   // Turkmenistan
    ("TN", 35.0, 9.8),    // Tunisia
    ("TR", 39.5, 33.0),   // Turkey
    ("TW", 24.0, 120.8),  // Taiwan
    ("TZ", -6.4, 34.9),   // Tanzania
    ("UA", 49.0, 31.0),   // Ukraine
    ("UG", 1.0, 32.5),    // Uganda
    ("US", 37.4, -92.2),  // United States
    ("UY", -34.3, -56.3), // Uruguay
    ("UZ", 40.5, 68.0),   // Uzbekistan
    ("VE", 9.0, -67.0),   // Venezuela
    ("VN", 15.5, 107.0),  // Vietnam
    ("YE", 15.0, 44.5),   // Yemen
    ("ZA", -28.0, 27.0),  // South Africa
    ("ZM", -13.5, 28.0),  // Zambia
    ("ZW", -19.0, 29.8),  // Zimbabwe
];

#[cfg(test)]
mod tests {
    use super::*;

    fn p(lat: f64, lon: f64) -> Point {
        Point::new(lat, lon).unwrap()
    }

    #[test]
    fn a_region_is_hinted_to_the_nearest_location_its_objects_may_have() {
        for (place, lat, lon, hint) in [
            ("Dublin", 53.35, -6.26, "weur"),
            ("Amsterdam", 52.37, 4.90, "weur"),
            ("Stockholm", 59.33, 18.07, "eeur"),
            ("Kyiv", 50.45, 30.52, "eeur"),
            ("Toronto", 43.65, -79.38, "enam"),
            ("Dallas", 32.78, -96.80, "enam"),
            ("Denver", 39.74, -104.99, "wnam"),
            ("Vancouver", 49.28, -123.12, "wnam"),
            ("Bogotá", 4.71, -74.07, "sam"),
            ("Buenos Aires", -34.60, -58.38, "sam"),
            ("Cape Town", -33.92, 18.42, "afr"),
            ("Cairo", 30.04, 31.24, "me"),
            ("Riyadh", 24.71, 46.68, "me"),
            ("Delhi", 28.61, 77.21, "apac"),
            ("Seoul", 37.57, 126.98, "apac"),
            ("Jakarta", -6.21, 106.85, "apac"),
            ("Melbourne", -37.81, 144.96, "oc"),
            ("Perth", -31.95, 115.86, "oc"),
        ] {
            assert_eq!(location_hint(p(lat, lon)), hint, "{place}");
        }
    }

    const LONDON: (f64, f64) = (51.5074, -0.1278);
    const FRANKFURT: (f64, f64) = (50.1109, 8.6821);
    const TOKYO: (f64, f64) = (35.6762, 139.6503);
    const SYDNEY: (f64, f64) = (-33.8688, 151.2093);
    const NEW_YORK: (f64, f64) = (40.7128, -74.0060);
    const LOS_ANGELES: (f64, f64) = (34.0522, -118.2437);

    fn km(a: (f64, f64), b: (f64, f64)) -> f64 {
        distance_km(p(a.0, a.1), p(b.0, b.1))
    }

    fn assert_within_one_percent(actual: f64, expected: f64) {
        assert!(
            (actual - expected).abs() <= expected * 0.01,
            "{actual} km is not within 1% of {expected} km"
        );
    }

    #[test]
    fn known_city_pairs_are_within_one_percent() {
        assert_within_one_percent(km(LONDON, FRANKFURT), 636.0);
        assert_within_one_percent(km(TOKYO, SYDNEY), 7_820.0);
        assert_within_one_percent(km(NEW_YORK, LOS_ANGELES), 3_936.0);
    }

    #[test]
    fn distance_is_symmetric_and_zero_to_itself() {
        let cities = [LONDON, FRANKFURT, TOKYO, SYDNEY, NEW_YORK, LOS_ANGELES];
        for a in cities {
            assert_eq!(km(a, a), 0.0);
            for b in cities {
                assert_eq!(km(a, b), km(b, a));
            }
        }
    }

    /// `chord2 / 4` and the haversine's `h` are the same quantity,
    /// sin²(θ/2); placement relies on their computed values never being
    /// further apart than about 1e-14 (see `placement::CHORD_MARGIN`).
    #[test]
    fn the_chord_is_four_times_the_haversine_h() {
        let mut rng = crate::domain::test_rng::Rng(0xc0_5e);
        let mut worst: f64 = 0.0;
        for i in 0..200_000 {
            let a = p(rng.between(-90.0, 90.0), rng.between(-180.0, 180.0));
            // Every fourth pair is nearly antipodal, every fourth nearly equal.
            let b = match i % 4 {
                0 => p(
                    (-a.lat + rng.between(-1e-6, 1e-6)).clamp(-90.0, 90.0),
                    if a.lon > 0.0 {
                        a.lon - 180.0
                    } else {
                        a.lon + 180.0
                    },
                ),
                1 => p(
                    (a.lat + rng.between(-1e-6, 1e-6)).clamp(-90.0, 90.0),
                    (a.lon + rng.between(-1e-6, 1e-6)).clamp(-180.0, 180.0),
                ),
                _ => p(rng.between(-90.0, 90.0), rng.between(-180.0, 180.0)),
            };
            let lat1 = a.lat.to_radians();
            let lat2 = b.lat.to_radians();
            let h = ((lat2 - lat1) / 2.0).sin().powi(2)
                + lat1.cos() * lat2.cos() * ((b.lon - a.lon).to_radians() / 2.0).sin().powi(2);
            let c = chord2(&unit_vector(a), &unit_vector(b));
            worst = worst.max((c / 4.0 - h).abs());
            assert!((0.0..=4.0 + 1e-14).contains(&c), "{c}");
        }
        assert!(worst < 1e-14, "chord and haversine differ by {worst:e}");
    }

    #[test]
    fn antipodes_are_half_the_circumference_apart() {
        let half = std::f64::consts::PI * EARTH_RADIUS_KM;
        assert!((half - 20_015.1).abs() < 0.1);
        for (lat, lon) in [(0.0, 0.0), (51.5, -0.1), (-33.9, 151.2), (90.0, 0.0)] {
            let antipode = p(-lat, if lon > 0.0 { lon - 180.0 } else { lon + 180.0 });
            let d = distance_km(p(lat, lon), antipode);
            assert!((d - half).abs() < 1e-6, "{d}");
        }
    }

    #[test]
    fn longitudes_wrap_across_the_date_line() {
        // 1 degree of longitude on the equator, measured across +-180.
        let d = distance_km(p(0.0, 179.5), p(0.0, -179.5));
        assert!((d - 111.2).abs() < 0.1, "{d}");
    }

    #[test]
    fn points_out_of_range_or_not_finite_are_rejected() {
        assert!(Point::new(90.0, 180.0).is_some());
        assert!(Point::new(-90.0, -180.0).is_some());
        for (lat, lon) in [
            (90.1, 0.0),
            (-90.1, 0.0),
            (0.0, 180.1),
            (0.0, -180.1),
            (f64::NAN, 0.0),
            (0.0, f64::INFINITY),
        ] {
            assert_eq!(Point::new(lat, lon), None, "{lat}, {lon}");
        }
    }

    #[test]
    fn points_are_read_from_decimal_degrees() {
        assert_eq!(
            Point::parse("51.50740", " -0.1278 "),
            Some(Point {
                lat: 51.5074,
                lon: -0.1278
            })
        );
        assert_eq!(Point::parse("-90", "180"), Point::new(-90.0, 180.0));
        assert_eq!(Point::parse("1e1", "0"), Point::new(10.0, 0.0));
        for (lat, lon) in [
            ("", "0"),
            ("51.5", ""),
            ("NaN", "0"),
            ("0", "inf"),
            ("+51.5", "0"),
            (".5", "0"),
            ("5.", "0"),
            ("05.1", "0"),
            ("51,5", "0"),
            ("90.0001", "0"),
            ("0", "-180.5"),
            ("1e400", "0"),
            ("\"51.5\"", "0"),
        ] {
            assert_eq!(Point::parse(lat, lon), None, "{lat}, {lon}");
        }
        // Within a unit in the last place of Rust's own reading.
        for text in ["51.5074", "-33.8688", "139.6503", "0.000001", "-0.1278"] {
            let ours = Point::parse("0", text).unwrap().lon;
            let exact: f64 = text.parse().unwrap();
            assert!((ours - exact).abs() <= exact.abs() * f64::EPSILON, "{text}");
        }
    }

    #[test]
    fn the_centroid_table_is_sorted_unique_and_valid() {
        assert!(CENTROIDS.len() >= 60);
        for pair in CENTROIDS.windows(2) {
            assert!(pair[0].0 < pair[1].0, "{} then {}", pair[0].0, pair[1].0);
        }
        for &(code, lat, lon) in CENTROIDS {
            assert!(code.len() == 2 && code.bytes().all(|b| b.is_ascii_uppercase()));
            assert!(Point::new(lat, lon).is_some(), "{code}");
            assert_eq!(country_centroid(code), Some(Point { lat, lon }));
        }
    }

    #[test]
    fn the_most_populous_countries_have_centroids() {
        let populous = [
            "IN", "CN", "US", "ID", "PK", "NG", "BR", "BD", "RU", "MX", "ET", "JP", "PH", "EG",
            "CD", "VN", "IR", "TR", "DE", "TH", "GB", "TZ", "FR", "ZA", "IT", "KE", "MM", "CO",
            "KR", "UG", "SD", "ES", "DZ", "AR", "IQ", "AF", "PL", "CA", "MA", "SA", "UA", "AO",
            "UZ", "YE", "PE", "MY", "GH", "MZ", "NP", "MG", "CI", "VE", "CM", "NE", "AU", "KP",
            "TW", "ML", "BF", "SY", "LK", "MW", "ZM", "RO", "CL", "KZ", "SG",
        ];
        for code in populous {
            assert!(country_centroid(code).is_some(), "{code}");
        }
    }

    #[test]
    fn each_seed_country_centroid_is_nearest_to_a_region_in_that_country() {
        // The seed regions (seeds/dev.sql): a client known only by country
        // should land in its own country when a region is there.
        let regions = [
            ("DE", 50.1109, 8.6821),
            ("GB", 51.5074, -0.1278),
            ("US", 39.0438, -77.4874),
            ("US", 37.3382, -121.8863),
            ("BR", -23.5505, -46.6333),
            ("JP", 35.6762, 139.6503),
            ("SG", 1.3521, 103.8198),
            ("ZA", -26.2041, 28.0473),
        ];
        for (country, _, _) in regions {
            let centre = country_centroid(country).unwrap();
            let nearest = regions
                .iter()
                .min_by(|a, b| {
                    let da = distance_km(centre, p(a.1, a.2));
                    let db = distance_km(centre, p(b.1, b.2));
                    da.total_cmp(&db)
                })
                .unwrap();
            assert_eq!(nearest.0, country);
        }
    }

    #[test]
    fn unknown_and_malformed_codes_have_no_centroid() {
        for code in ["", "X", "XX", "T1", "ZZ", "DEU", "D\u{e9}", "\u{e9}"] {
            assert_eq!(country_centroid(code), None, "{code:?}");
        }
    }

    #[test]
    fn codes_are_matched_case_insensitively() {
        assert_eq!(country_centroid("de"), country_centroid("DE"));
        assert_eq!(country_centroid("gB"), country_centroid("GB"));
    }
}
