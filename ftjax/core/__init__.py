"""What every layer shares: errors, parameter-path trees and rules, atomic files."""
